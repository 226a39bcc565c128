"""Grafana dashboards for ringserve, generated from the metric list in app/metrics.py.

``python -m dashboards`` (or ``ringserve dashboards build``) writes ``dashboards/json/*.json``;
the JSON is never edited by hand.
"""
