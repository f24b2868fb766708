"""`lva serve`: Ollama's and OpenAI's HTTP APIs in front of one model, for apps that talk to a local model.

    app.py          the Starlette app: routes, API key, request log, errors in each API's shape
    ollama_api.py   /api/*: request and response shapes, and their translation into the worker's jobs
    openai_api.py   /v1/*: the same for OpenAI's chat completions
    inputs.py       what both APIs do with a request: body limit, JSON and field types, images, messages
    tools.py        tool calling for both: the tools offered, tool_choice, the call read back from an answer
    worker.py       the one thread that owns the model; requests wait in its queue
    catalog.py      the models a client can ask for, by the names `lva models` shows

Starlette and uvicorn, because the work here is a long-running stream per request that must notice a
client leaving: Starlette's StreamingResponse listens for the disconnect and cancels the stream, and
uvicorn is the ASGI server Starlette is built and tested with. Both are small and well kept, and pydantic
(already what the ollama and openai clients use) checks the request shapes. Nothing here knows ggml:
the worker talks to the chat engine (assistant.chat) and the runtime's interface.
"""
