import OutboardSystem

// The ring workers' set-up and result messages use the one wire codec; a short or
// malformed message is simply refused (nil), so its error type carries nothing more.
typealias WireReader = OutboardSystem.WireReader<WireFormatError>
