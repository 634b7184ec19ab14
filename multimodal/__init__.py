"""dreamlab multimodal layer."""
