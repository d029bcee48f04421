"""`openseek chat --model DIR`: talk to a model in the terminal, on the same Engine and code path as the server.

The reasoning streams first (dimmed on a terminal), then the answer. Earlier answers go back into the prompt
without their reasoning, as the server does. `--reasoning-budget N` closes the reasoning after N tokens, so the
answer always comes. `/reset` forgets the conversation, `/exit` (or Ctrl-D) quits.
"""

from __future__ import annotations

import asyncio
import sys

from openseek.device import resolve_device
from openseek.flags import add_engine_arguments
from openseek.serve.gate import APIError
from openseek.serve.protocol import ChatCompletionRequest
from openseek.serve.server import Server, ServeConfig, load_engine

DIM, RESET = "\033[2m", "\033[0m"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="model directory (HF format, with its tokenizer)")
    parser.add_argument("--system", help="a system prompt")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (R1 recommends 0.5-0.7)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-tokens", type=int, help="per answer (default: whatever fits the context)")
    parser.add_argument("--seed", type=int)
    add_engine_arguments(parser)


def main(args) -> int:
    engine, tokenizer = load_engine(args.model, args.dtype, resolve_device(args.device), max_batch_size=1,
                                    quantize=args.quantize, group_size=args.group_size,
                                    speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                                    compile=args.compile, cuda_graphs=args.cuda_graphs)
    config = ServeConfig(model_name="chat", max_model_len=engine.max_seq_len, reasoning_budget=args.reasoning_budget)
    try:
        return asyncio.run(_session(Server(engine, tokenizer, config), args))
    finally:
        engine.close()


async def _session(server: Server, args) -> int:
    styled = sys.stdout.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    loop = asyncio.get_running_loop()
    print("openseek chat: /reset forgets the conversation, /exit quits.", flush=True)
    while True:
        try:
            line = await loop.run_in_executor(None, input, "you> ")
        except EOFError:
            print()
            return 0
        text = line.strip()
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history.clear()
            print("(conversation forgotten)", flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        request = ChatCompletionRequest(model="chat", messages=system + history, temperature=args.temperature,
                                        top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
        try:
            job = server.chat_job(request)
            server.start(job)
        except APIError as e:  # e.g. the conversation outgrew the context: say so, forget the question
            print(f"error: {e.message}", file=sys.stderr, flush=True)
            history.pop()
            continue
        answer, thinking = [], False
        async for piece in server.run(job):
            if piece.reasoning:
                if not thinking:
                    print(DIM if styled else "", end="", flush=True)
                    print("thinking: " if not styled else "", end="")
                    thinking = True
                print(piece.reasoning, end="", flush=True)
            if piece.content:
                if thinking:
                    print(RESET if styled else "", end="\n\n")
                    thinking = False
                answer.append(piece.content)
                print(piece.content, end="", flush=True)
        print(RESET if thinking and styled else "", flush=True)
        history.append({"role": "assistant", "content": "".join(answer)})
