"""Cluster bring-up: the Serve config, the scripts sky/'s YAMLs run on each node (start_head,
start_worker, deploy, wait_ready, setup_node, run_node) with their Python helpers
(render_config, ready, fetch_model), and network isolation for local runs (isolation/)."""
