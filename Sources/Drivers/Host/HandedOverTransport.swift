import OutboardSystem
import VhostUser
import Virtio

/// A virtio transport whose device the manager opens and hands to the sandboxed driver as
/// a descriptor (`deviceConnection`): a connected vhost-user socket (a VFIO device fd next).
/// The driver makes the transport (its eventfds) before entering the sandbox, connects it
/// to each descriptor it is given, and disconnects it when the device is lost.
protocol HandedOverTransport: VirtioTransport, ~Copyable {
    /// Takes the device the manager handed over and does the transport's own set-up (the
    /// vhost-user handshake).
    mutating func connect(_ fd: consuming OwnedFD) throws(VirtioTransportError)
    /// Lets go of the device: nothing the transport does reaches it afterwards.
    mutating func disconnect()
}

extension VhostUserTransport: HandedOverTransport {}
