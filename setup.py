from setuptools import find_packages, setup

# kernels/ installs as nsa_kernels (the bare name `kernels` belongs to another PyPI package).
PACKAGES = find_packages(include=["megatron_nsa", "megatron_nsa.*"]) + [
    "nsa_kernels", *("nsa_kernels." + name for name in find_packages("kernels"))
]

setup(
    name="megatron-nsa",
    version="0.1.0",
    description="Native Sparse Attention (NSA) for Megatron-Core: reference, Triton kernels, context parallelism",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir={"megatron_nsa": "megatron_nsa", "nsa_kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "triton; platform_system=='Linux'",
        "megatron-core>=0.16",
        "numpy",
        "tensorboard",
        "pyyaml",
    ],
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": [
            "megatron-nsa-train=megatron_nsa.training.train:main",
            "megatron-nsa-build-dataset=megatron_nsa.data.build_dataset:main",
            "megatron-nsa-eval-loss=megatron_nsa.eval.loss:main",
            "megatron-nsa-needle=megatron_nsa.eval.needle:main",
            "megatron-nsa-export=megatron_nsa.eval.export:main",
            "megatron-nsa-pretrain-gpt=megatron_nsa.megatron_lm.pretrain_gpt:main",
        ],
    },
)
