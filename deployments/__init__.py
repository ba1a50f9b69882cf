"""Ray Serve model servers: one generic ``ModelServer`` bound per registered model (pipeline.registry),
what crosses its handle (``protocol``), and the store both sides use. Never imports ``serve_app``."""
