"""`dllama-api`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one node or a cluster."""
