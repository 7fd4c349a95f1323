"""Quickstart with Hugging Face transformers:

python3 examples/qwen/quickstart.py --hf_model_dir Qwen/Qwen-7B-Chat

Loads the checkpoint into the library's reference (transformers' Qwen2ForCausalLM with the Qwen (v1) weights
mapped; exact for contexts up to seq_length), prints the model structure and answers one chat question.
"""

import sys
from pathlib import Path

try:
    import qwen_trtllm  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from qwen_trtllm.cli import parser, run_cli  # noqa: E402
from qwen_trtllm.dtypes import add_dtype_argument, torch_dtype  # noqa: E402


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--hf_model_dir", default="Qwen/Qwen-7B-Chat", help="local Hugging Face Qwen checkpoint directory")
    p.add_argument("--input_text", default="你好，请问你叫什么？", help="the question")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens of the answer at most (greedy)")
    add_dtype_argument(p, "--dtype", default="float32", help="dtype of the model")
    args = p.parse_args()

    from qwen_trtllm.models.qwen.reference import load_reference
    from qwen_trtllm.tokenizer import QWenTokenizer, decode_response, make_context, stop_token_ids

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_reference(args.hf_model_dir, dtype=torch_dtype(args.dtype), device=device)
    print(model)
    tok = QWenTokenizer.from_dir(args.hf_model_dir)
    _, ids = make_context(tok, args.input_text)
    out = model.generate(torch.tensor([ids], device=device), max_new_tokens=args.max_new_tokens, do_sample=False,
                         eos_token_id=sorted(stop_token_ids(tok, "chatml")), pad_token_id=tok.eod_id)
    print(f'Input: "{args.input_text}"\nOutput: "{decode_response(out[0, len(ids):].tolist(), tok)}"')
    return 0


if __name__ == "__main__":
    run_cli(main)
