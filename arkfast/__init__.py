"""arkfast: distil multi-agent LLM debate into one model, fast."""
__version__ = "0.1.0"
