"""Layer geometry analysis: the proxy that scores decoder layers, and its saliency check."""
