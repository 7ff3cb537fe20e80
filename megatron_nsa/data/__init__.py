"""Data for training and evaluation: below both, so that neither imports the other for it.

    tokenizer      the byte tokenizer (and local Hugging Face tokenizers), numpy only
    retrieval      the synthetic key/value retrieval task (data.source=retrieval), numpy only
    build_dataset  `python -m megatron_nsa.data.build_dataset`: text files -> a Megatron indexed dataset
    datasets       a recipe's tokenizer, its training / validation datasets and micro-batches

Importing the package imports none of its modules (the numpy-only ones must stay importable
before megatron-core is loaded).
"""
