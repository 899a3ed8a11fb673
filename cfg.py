import kvdist
from kvdist import SamplingParams as SP
for kw in (dict(max_model_len=-5), dict(max_model_len=0), dict(max_model_len=1), dict(num_blocks=3.5), dict(block_size=16.0), dict(max_num_seqs=1.5), dict(max_num_batched_tokens="8"), dict(seed=-1), dict(seed="x"), dict(num_blocks=True)):
    try:
        llm = kvdist.LLM("tiny", **kw)
        try:
            o = llm.generate([[1, 2]], SP(max_tokens=2, temperature=0.5))[0]
            print(kw, "constructed; generate ->", o.finish_reason, o.error, o.output_token_ids)
        except Exception as e:
            print(kw, "constructed; generate EXC", type(e).__name__, str(e)[:150])
        llm.shutdown()
    except Exception as e:
        print(kw, "ctor EXC", type(e).__name__, str(e)[:150])
