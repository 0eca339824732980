"""Chat with a checkpoint in the terminal (nanochat `scripts/chat_cli.py`).

    python -m serve.cli                      # newest SFT checkpoint, multi-turn chat
    python -m serve.cli -p "Why is the sky blue?"  # one question: prints only the answer, exits
    python -m serve.cli -i base -p "The capital of France is"  # a base model just continues the text

Commands in the chat: `quit` / `exit` leave, `clear` starts a new conversation.
"""

from __future__ import annotations

import argparse
import sys

from jaxchat.engine import Engine


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat with a jaxchat model in the terminal")
    parser.add_argument("-i", "--source", default="sft", choices=["base", "sft", "rl"],
                        help="which checkpoints: base (text continuation) | sft | rl")
    parser.add_argument("-g", "--model-tag", default=None, help="model tag, e.g. d20 (default: the largest)")
    parser.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest)")
    parser.add_argument("-p", "--prompt", default="", help="ask one question (or continue one text), print, exit")
    parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)")
    parser.add_argument("-k", "--top-k", type=int, default=50, help="sample among the k most likely tokens")
    parser.add_argument("-m", "--max-tokens", type=int, default=256, help="most tokens per reply")
    parser.add_argument("--seed", type=int, default=42, help="sampling seed of the first reply (then +1 per turn)")
    return parser.parse_args(argv)


def stream_reply(engine: Engine, tokens: list[int], args, seed: int, out=sys.stdout) -> str:
    """Generate one reply to `tokens`, printing its text as the engine decodes it; returns the text."""
    text = ""
    for o in engine.submit(tokens, max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                           seed=seed):
        out.write(o.text)
        out.flush()
        text += o.text
    out.write("\n")
    out.flush()
    return text


def main(argv=None, input_fn=input) -> None:
    args = parse_args(argv)
    from jaxchat.checkpoint import load_model_from  # lazy: `--help` stays instant

    params, config, tokenizer, meta = load_model_from(args.source, args.model_tag, args.step)
    engine = Engine(params, config, tokenizer)
    chat = args.source != "base"

    if not args.prompt:  # one-shot output is only the answer, for scripts and pipes
        mode = "chat" if chat else "text continuation"
        print(f"\njaxchat {args.source} model (step {meta.get('step', '?')}), {mode} mode\n{'-' * 50}\n"
              f"Type 'quit' or 'exit' to end, 'clear' to start over\n{'-' * 50}")
    messages, turn = [], 0  # the chat so far, rendered by the tokenizer each turn
    while True:
        if args.prompt:
            user_input = args.prompt
        else:
            try:
                user_input = input_fn("\nUser: " if chat else "\nText: ").strip()
            except (EOFError, KeyboardInterrupt):
                print("\nGoodbye!")
                break
        if user_input.lower() in ("quit", "exit"):
            print("Goodbye!")
            break
        if user_input.lower() == "clear":
            messages = []
            print("Conversation cleared.")
            continue
        if not user_input:
            continue

        if chat:  # the conversation, rendered by the tokenizer for the next assistant turn
            messages.append({"role": "user", "content": user_input})
            render = lambda: tokenizer.render_for_completion(  # noqa: E731
                {"messages": messages + [{"role": "assistant", "content": ""}]}, max_tokens=1 << 30)
            prompt = render()
            if len(prompt) + args.max_tokens > config.sequence_len and len(messages) > 1:
                print(f"(context of {config.sequence_len} tokens is full: starting a new conversation)")
                messages = messages[-1:]
                prompt = render()
            if not args.prompt:
                print("\nAssistant: ", end="", flush=True)
            messages.append({"role": "assistant", "content": stream_reply(engine, prompt, args, args.seed + turn)})
        else:  # a base model continues the text: bos + text, every input independent
            print(user_input, end="", flush=True)
            stream_reply(engine, tokenizer.encode(user_input, prepend=tokenizer.get_bos_token_id()), args,
                         args.seed + turn)
        turn += 1
        if args.prompt:
            break


if __name__ == "__main__":
    from jaxchat.common import run_cli

    run_cli(main)
