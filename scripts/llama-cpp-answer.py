#!/usr/bin/env python3
"""Greedy answer of llama.cpp (llama-cpp-python, in the venv) to one chat turn, from a GGUF file
and the chat template it carries: the demo's check that the job's exported GGUF works where GGUF
files are used.

usage: llama-cpp-answer.py MODEL.gguf SYSTEM USER [MAX_TOKENS]
"""
import sys

import llama_cpp


def main() -> None:
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__.strip().splitlines()[-1])
    path, system, user = sys.argv[1:4]
    max_tokens = int(sys.argv[4]) if len(sys.argv) == 5 else 32
    llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=2, verbose=False)
    out = llm.create_chat_completion(
        messages=[{"role": "system", "content": system}, {"role": "user", "content": user}],
        temperature=0.0, max_tokens=max_tokens)
    print(out["choices"][0]["message"]["content"])


if __name__ == "__main__":
    main()
