"""`pocketlm serve`: an OpenAI-compatible HTTP server over the engines' schedulers.

Needs the `server` extra (`pip install pocketlm[server]`: FastAPI and uvicorn). The application is
`app.create_app` (routes in `openai_api`); `run.serve` loads the models and runs it with uvicorn.
Reference: docs/server.md."""
