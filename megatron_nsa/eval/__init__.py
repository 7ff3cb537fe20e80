"""Evaluation of trained checkpoints (the retrieval task they may be trained on is megatron_nsa.data.retrieval).

    haystack        needle-in-a-haystack samples (fact at a depth of exact-length filler)
    scoring         teacher-forced answer accuracy
    selections      NSA's selected blocks recorded during a forward pass; does the question select the needle?
    checkpoints     find a checkpoint and its recipe (no megatron import)
    model_loader    build the checkpoint's model and load its weights, one process
    loss            `python -m megatron_nsa.eval.loss`: validation loss
    needle          `python -m megatron_nsa.eval.needle`: accuracy over depths x lengths
    report, plots   JSON / markdown tables, PNGs with matplotlib when installed
"""
