"""Quickstart-style Hugging Face FedAvg app: the baseline fedsft is benchmarked against."""
