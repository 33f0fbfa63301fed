import OutboardSystem
import VFIO
import VhostUser
import Virtio
import VirtioPCI

/// A virtio transport whose device the manager opens and hands to the sandboxed driver as
/// a descriptor (`deviceConnection`): a connected vhost-user socket, a VFIO device fd.
/// The driver makes the transport (its eventfds) before entering the sandbox, connects it
/// to each descriptor it is given, and disconnects it when the device is lost.
protocol HandedOverTransport: VirtioTransport, ~Copyable {
    /// Takes the device the manager handed over and does the transport's own set-up (the
    /// vhost-user handshake; for virtio-pci the capability walk and MSI-X routing).
    mutating func connect(_ fd: consuming OwnedFD) throws(VirtioTransportError)
    /// Lets go of the device: nothing the transport does reaches it afterwards.
    mutating func disconnect()
}

extension VhostUserTransport: HandedOverTransport {}

/// A virtio-pci device the manager bound to vfio-pci: the descriptor is the device fd
/// (config space, BARs, interrupts; no DMA mapping, which stays with the manager).
extension VirtioPCITransport: HandedOverTransport where Function == VFIODevice {
    mutating func connect(_ fd: consuming OwnedFD) throws(VirtioTransportError) {
        let device: VFIODevice
        do { device = try VFIODevice(adopting: fd) } catch { throw .unsupported("the VFIO device: \(error)") }
        try attach(device)
    }

    mutating func disconnect() { detach() }
}
