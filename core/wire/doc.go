// Package wire is phaul's control protocol: the protobuf messages of
// control.proto (generated code in control.pb.go, regenerated with
// `go generate`) and their framing on yamux stream 1.
//
// A frame is an 8-byte header then a protobuf Message:
//
//	off size field    rule
//	0   1    version  = FrameVersion, else ErrVersion
//	1   1    flags    0, else ErrFrame
//	2   2    reserved 0, else ErrFrame
//	4   4    length   payload bytes, big-endian, <= MaxPayload, else ErrFrameTooLarge
//
// Conn is safe for one reader and one writer at a time.
package wire

//go:generate protoc --go_out=. --go_opt=paths=source_relative control.proto
