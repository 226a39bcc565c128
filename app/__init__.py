"""ringserve's serving side: Ray Serve deployments, OpenAI-shaped API, CLI."""
