import OutboardSystem
import SystemPackage

/// Why a control message could not be received.
public enum ChannelError: Error, Equatable, Sendable, CustomStringConvertible {
    case socket(SocketError)
    case control(ControlError)

    public var description: String {
        switch self {
        case .socket(.closed): return "peer closed the connection"
        case .socket(.messageTooLarge(let l)): return "message larger than \(l) bytes"
        case .socket(.tooManyDescriptors(let l)): return "more than \(l) file descriptors"
        case .socket(.system(let e)): return "socket error: \(e)"
        case .control(let c): return c.description
        }
    }
}

/// A decoded message and the descriptors that came with it (checked: exactly as many as
/// its type carries). Descriptors not taken are closed when this goes away.
public struct ControlDelivery: ~Copyable, Sendable {
    public let message: ControlMessage
    public var descriptors: ReceivedDescriptors

    /// Takes descriptor `index` (they are all present: the count was checked).
    public mutating func take(_ index: Int) -> OwnedFD {
        guard let fd = descriptors.take(index) else { preconditionFailure("descriptor \(index) taken twice or missing") }
        return fd
    }
}

extension UnixSocket {
    public func send(_ message: ControlMessage, descriptors: [FileDescriptor] = [], nonBlocking: Bool = false) throws(Errno) {
        precondition(descriptors.count == message.type.descriptorCount, "\(message.type) carries \(message.type.descriptorCount) descriptors")
        try send(message.encode(), descriptors: descriptors, nonBlocking: nonBlocking)
    }

    /// Receives and validates one message. `limit`: the largest message accepted.
    public func receiveControl(limit: Int = ControlProtocol.maxMessageBytes, nonBlocking: Bool = false) throws(ChannelError) -> ControlDelivery {
        let received: ReceivedMessage
        do {
            received = try receive(maxBytes: limit, maxDescriptors: ControlProtocol.maxDescriptors, nonBlocking: nonBlocking)
        } catch {
            throw .socket(error)
        }
        let bytes = received.bytes
        let descriptors = received.descriptors
        let message: ControlMessage
        do {
            message = try ControlMessage.decode(bytes, limit: limit)
        } catch {
            throw .control(error)
        }
        guard descriptors.count == message.type.descriptorCount else {
            throw .control(.wrongDescriptorCount(type: String(describing: message.type),
                                                 expected: message.type.descriptorCount, received: descriptors.count))
        }
        return ControlDelivery(message: message, descriptors: descriptors)
    }
}
