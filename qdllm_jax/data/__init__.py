"""Data for the shipped tiny LLaDA: corpus, tokenizer, synthetic tasks, batches and task scoring.

  corpus.load_splits()                      -> {'train': [chapter], 'heldout': [chapter]} (shipped/corpus/kjv.txt)
  tokenizer.load_tokenizer(dir)             -> HF tokenizer; special ids EOS=pad 0, BOS 1, <|mdm_mask|> 2
  tasks.load_eval_set('gen' | 'mc')         -> fixed eval instances (qdllm_jax/data/eval_sets/{gen,mc}.jsonl)
  sequences.gen_prompt_ids(tok, ex)         -> [BOS] + prompt ids; generate sequences.GEN_LEN (8) tokens
  sequences.decode_answer(tok, gen_ids)     -> text up to the first EOS, stripped; == ex.answer.strip()
  sequences.mc_ids(tok, ex.prompt, choice)  -> (context ids, continuation ids) for a likelihood query
  sequences.encode_stream(tok, docs)        -> [BOS] doc [EOS] ... token stream (held-out perplexity)
"""
