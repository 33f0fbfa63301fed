// Placeholder; replaced by the Virtio module.
