"""Ray Serve application for dpsynth: certified DP adapters behind an HTTP API (thin: it calls into dpsynth)."""
