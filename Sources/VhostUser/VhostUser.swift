// Placeholder; replaced by the VhostUser module.
