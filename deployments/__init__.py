"""The Ray Serve application: OpenAI-compatible ingress, batched embedder, router, model replicas.

Built in the serving issue on top of `banditrouter` (policies, schemas, config); empty until then.
"""
