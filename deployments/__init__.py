"""Ray Serve deployments: one thin class per model, each with its own builder."""
