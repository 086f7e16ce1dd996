"""Install advalign_jax: `pip install -e .` (library + `advalign-jax` command), `pip install -e '.[test]'`."""
import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "advalign_jax" / "__init__.py").read_text()).group(1)

# Lower bounds are the oldest releases whose APIs the code uses and that the test suite has run
# against (jax 0.10.2, flax 0.12.8, optax 0.2.8, orbax-checkpoint 0.12.8, tensorflow-cpu 2.21).
# TensorFlow only feeds tf.data on the CPU: the CPU build is enough, and on Linux x86-64 that build is
# `tensorflow-cpu` (a quarter of the size). Elsewhere the plain `tensorflow` wheel is the only one.
TF_CPU = "platform_system == 'Linux' and platform_machine == 'x86_64'"
NOT_TF_CPU = "platform_system != 'Linux' or platform_machine != 'x86_64'"
INSTALL_REQUIRES = [
    "jax>=0.10.0",
    "jaxlib>=0.10.0",
    "flax>=0.12.0",
    "optax>=0.2.5",
    "orbax-checkpoint>=0.11.0",
    "chex>=0.1.90",
    "numpy>=1.26",
    "scipy>=1.11",
    f"tensorflow-cpu>=2.18; {TF_CPU}",
    f"tensorflow>=2.18; {NOT_TF_CPU}",
    "tensorflow-datasets>=4.9.7",
    "ml_collections>=1.0.0",
    "tqdm>=4.66",
    "matplotlib>=3.8",
    "tensorboard>=2.16",
    "h5py>=3.10",
    "pillow>=10.0",
    "scikit-learn>=1.3",  # its bundled digits: the offline real-image PAG run
]

setup(
    name="advalign_jax",
    version=VERSION,
    description="JAX toolkit for adversarial robustness and human alignment of vision models",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["advalign_jax", "advalign_jax.*"]),
    package_data={"advalign_jax": ["data/embedded/*.tfrecords", "data/embedded/*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": [
            "pytest>=8.0",
            "pytest-xdist>=3.5",
            "nbclient>=0.10",
            "nbformat>=5.10",
            "ipykernel>=6.29",
            # independent writers and reference implementations the tests compare against
            "safetensors>=0.4",
            "torch==2.13.0",
            "validators>=0.20",  # needed by vit-keras (tests/requirements-reference.txt)
            "opencv-python-headless>=4.8",  # imported by vit-keras
        ],
    },
    entry_points={"console_scripts": ["advalign-jax=advalign_jax.cli.main:main"]},
)
