"""Box-prompted segmentation of images of any size at native resolution."""
