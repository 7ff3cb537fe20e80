"""The research harness: experiments that train and evaluate models with the project's own stack.

    nsa_vs_dense       NSA against its dense twin on the same data and tokens (language modelling, the
                       retrieval task with needle evaluation, length curricula with --stages)
    plot_nsa_vs_dense  the report of an nsa_vs_dense run (markdown, PNGs)
    selection_overlap  how many selected blocks neighbouring tokens share in a trained model

Run from the repository root as modules, e.g. `python -m experiments.nsa_vs_dense --help`. The library
(megatron_nsa, nsa_kernels) never imports this package.
"""
