"""Data tools: `make_demo` writes small real-video datasets (retrieval and QA) for the demo."""
