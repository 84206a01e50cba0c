"""What a sub-network is, what it costs, and which ones a search may visit."""

from prunetune.search_spaces.subnet import SubnetConfig

__all__ = ["SubnetConfig"]
