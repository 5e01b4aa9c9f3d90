"""pacs-agent: the integration service of the X-ray foundation-model plugin for the PACS.

This package never imports torch: it runs on a small VM without a GPU stack.
"""

__version__ = "0.1.0"
