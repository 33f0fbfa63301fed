import OutboardRings
import VFIO
import Virtio

// VirtioPCITransport (virtio 1.2 §4.1, modern devices) comes here, generic over PCIFunction.
