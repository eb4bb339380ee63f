"""Stage 1: synthetic defect images with pixel masks and labels, written as WebDataset shards."""
