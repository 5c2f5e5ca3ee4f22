"""momentum-proxy: fine-grained image retrieval with momentum-updated class proxies."""
import os

# Weights come from local files only (pip packages, --weights, local caches); never from the network at run time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
