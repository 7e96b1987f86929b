"""`tah serve`: an OpenAI-compatible server for a TaH checkpoint (standard library imports only here)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Serve a TaH checkpoint over HTTP with the OpenAI API: POST /v1/chat/completions and
/v1/completions (streaming or not), GET /v1/models, /health and /metrics (Prometheus). Requests
join the running batch between decode steps and leave it when done (continuous batching); each
response carries a `tah` field with the passes per generated token (1, or 2+ where it iterated).
SIGTERM (or Ctrl-C) stops taking requests, finishes the running ones, then exits.
"""


def register_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                                description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("--model", required=True, help="checkpoint directory (with its tokenizer files)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    serve.add_argument("--max-batch", type=int, default=32, help="requests decoding together (default: 32)")
    serve.add_argument("--max-waiting", type=int, default=256,
                       help="requests queued for a place in the batch; more are answered 503 (default: 256)")
    serve.add_argument("--threshold", type=float, default=None, help="decider threshold (default: the checkpoint's)")
    serve.add_argument("--threads", type=int, default=None,
                       help="CPU threads for the model's products (default: torch's). On a busy CPU, fewer "
                            "threads than cores leave one for the HTTP side and avoid threads waiting on each other")
    serve.add_argument("--served-name", default=None, help="the model name clients send (default: --model as given)")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from tah.errors import InputError
    from tah.serve.app import load_app

    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise InputError(f"--threads must be >= 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    app = load_app(args.model, threshold=args.threshold, served_name=args.served_name, max_batch=args.max_batch,
                   max_waiting=args.max_waiting)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
