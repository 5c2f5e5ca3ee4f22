"""momentum-proxy: fine-grained image retrieval with momentum-updated class proxies.

The objects a notebook needs, importable from here (each is loaded on first use, so `import momentum_proxy`
stays cheap and imports no torch):

    from momentum_proxy import TrainConfig, train, evaluate_run, load_embedder, build_index, retrieve

    cfg = TrainConfig(data="data/flowers", out="runs/flowers", epochs=10)  # for_data(data, out): its recipe
    train(cfg)                                  # val-selected checkpoint, test evaluated once
    hits = retrieve("runs/flowers", "photo.jpg", k=8).results

Every other piece lives in the subpackage named after its concern (see the docs' Layout page).
"""

import importlib
import os

# Weights come from local files only (pip packages, --weights, local caches); never from the network at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"

_PUBLIC = {
    # data
    "prepare_folder": "momentum_proxy.data.prepare",
    "generate_synthetic": "momentum_proxy.data.synthetic",
    # configuration and training
    "ModelConfig": "momentum_proxy.config",
    "TrainConfig": "momentum_proxy.training.config",
    "train": "momentum_proxy.training.loop",
    "resume": "momentum_proxy.training.loop",
    "MomentumProxyUpdate": "momentum_proxy.training.proxies",
    "create_loss": "momentum_proxy.training.losses",
    "EmbeddingNet": "momentum_proxy.models.net",
    # evaluation
    "evaluate_embeddings": "momentum_proxy.evaluation.metrics",
    "evaluate_run": "momentum_proxy.evaluation.jobs",
    # embedding and deployment
    "Embedder": "momentum_proxy.embedding.base",
    "load_embedder": "momentum_proxy.deploy.runtimes",
    "export_run": "momentum_proxy.deploy.export",
    # retrieval
    "IndexStore": "momentum_proxy.retrieval.store",
    "FaissStore": "momentum_proxy.retrieval.faiss_store",
    "MilvusStore": "momentum_proxy.retrieval.milvus_store",
    "open_store": "momentum_proxy.retrieval.stores",
    "Hit": "momentum_proxy.retrieval.hits",
    "build_index": "momentum_proxy.retrieval.build",
    "open_index": "momentum_proxy.retrieval.build",
    "retrieve": "momentum_proxy.retrieval.search",
    "Rerank": "momentum_proxy.retrieval.rerank",
    "rerank_knn": "momentum_proxy.retrieval.rerank",
    # experiments
    "tune_rerank": "momentum_proxy.experiments.tune_rerank",
    "best_rerank": "momentum_proxy.experiments.tune_rerank",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'momentum_proxy' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
