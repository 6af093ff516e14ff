"""The API's routes, one ``APIRouter`` per resource; ``service.api.create_app`` includes them in this order:

    operations   POST /generate, /interpolate, /likelihood: the routes that create jobs
    jobs         GET/DELETE /jobs/{id}, its frames, images, animations and event stream
    info         GET /models, /metrics: what the service serves and how it fares
    health       GET /healthz, /readyz: the probes (no key needed)
    page         GET /: the browser page, and its files under /static

Routes take what they need as typed dependencies (``service.deps``) and raise ``service.web.ApiError`` or the
domain's exceptions; ``service.web`` turns those into HTTP answers.
"""
