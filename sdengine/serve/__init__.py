"""`sdengine serve`: an AUTOMATIC1111-compatible HTTP API with dynamic batching.

    sdengine serve [MODEL] [--host 127.0.0.1] [--port 7860]      # one process, one model
    sdengine serve [MODEL] --ray --replicas 2                    # Ray Serve replicas

Parts, in the order a request meets them:
- app.py:       the FastAPI app (A1111's /sdapi/v1 endpoints, /health, /metrics) and its
                outer ASGI guard (bearer token, body cap, status counting);
- schemas.py:   A1111's request and response bodies (pydantic);
- requests.py:  request -> Spec (validated, images decoded) and Output -> response;
- scheduler.py: the bounded queue and worker thread in front of one pipeline;
- batching.py:  several Specs of one shape as one pipeline call;
- ray_app.py:   the same app as a Ray Serve application (ingress + model deployment);
- cli.py:       the `serve` subcommand.

The web stack is optional: `pip install "sdengine[serve]"` (FastAPI, uvicorn,
prometheus-client, Ray Serve). Without it, `sdengine serve` says so and exits.
"""

INSTALL_HINT = 'pip install "sdengine[serve]"'


def require(*modules: str):
    """Import-check the optional dependencies; ImportError naming the install command."""
    import importlib

    for name in modules or ("fastapi", "uvicorn", "prometheus_client"):
        try:
            importlib.import_module(name)
        except ImportError as e:
            what = "Ray Serve (--ray)" if name.startswith("ray") else "sdengine serve"
            raise ImportError(f"{what} needs the {name.split('.')[0]!r} package, which is not installed: "
                              f"{INSTALL_HINT}", name=name) from e
