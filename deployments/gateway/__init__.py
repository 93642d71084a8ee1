"""The HTTP gateway in front of the router, one module per concern:

    errors.py     the one error shape ({"error": {message, type, code, request_id}}) and the request id
    parsing.py    body size / JSON depth / number / text checks before pydantic sees a body; request schemas
    auth.py       API keys (stored hashed), scopes, the FastAPI security dependencies
    budgets.py    per-key budgets (reserve the maximum before dispatch, settle after) and rate limits, durable
    cost.py       a request's maximum cost, and token estimates when an upstream omits usage

`deployments/ingress.py` is the Serve deployment that wires them to the routes.
"""
