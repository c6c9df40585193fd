// Package pageserver will speak CRIU's page-server protocol (criu/page-xfer.c,
// 4.2 layout: 32-byte little-endian page_server_iov headers) on a yamux
// stream of the migration's connection, so that pre-copy rounds and the
// final dump stream memory to the destination instead of writing it to the
// source's disk (issue 4). Its wire format will be specified in spec.md
// beside this file before any code lands.
//
// Nothing is implemented yet: cold migration ships CRIU's image files with
// core/images.
package pageserver
