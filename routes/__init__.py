"""The REST API's layer between HTTP and services/, split the way FastAPI's full-stack template is.

`schemas` (bodies and their JSON), `deps` (credentials, filters, the per-key rate limit),
`middleware` (request id, body size, per-IP rate limit), `errors` (service errors -> HTTP), and one
`APIRouter` module per tag of endpoints. `api.py` builds the app from them. Routes call services
only; roles and org scoping are enforced there.
"""
