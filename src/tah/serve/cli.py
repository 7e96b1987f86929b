"""`tah serve`: its options (standard library imports only here); the server is `tah.serve.app.serve`."""

from __future__ import annotations

import argparse


def register_serve(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                                calls="tah.serve.app:serve")
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
    serve.add_argument("--device", default="auto",
                       help="where the model runs: auto (CUDA in bfloat16 when there is a GPU, else the CPU), cpu, "
                            "cuda or cuda:N (default: auto)")
    serve.add_argument("--engine", choices=("auto", "eager", "static"), default="auto",
                       help="decode engine of the running batch: auto (static-shape steps in CUDA graphs on a GPU "
                            "where the model allows, max_iter <= 2; the eager engine otherwise, the faster on a "
                            "CPU), eager or static (default: auto)")
    serve.add_argument("--served-name", default=None, help="the model name clients send (default: --model as given)")
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> None:
    from tah.serve.app import serve

    serve(args.model, host=args.host, port=args.port, max_batch=args.max_batch, max_waiting=args.max_waiting,
          threshold=args.threshold, threads=args.threads, served_name=args.served_name, device=args.device,
          engine=args.engine)
