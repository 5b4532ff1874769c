"""Serving a planner over an OpenAI-compatible HTTP API.

- cli.py: `alphadrive-ray serve`;
- app.py: the FastAPI app, request checks, images, the transformers backend;
- backend.py: what a backend is and returns (`ChatBackend`, `ChatResult`) and the API's
  errors; the vLLM backend (alphadrive_ray/engines/vllm_engine.py) needs only this module.
"""
