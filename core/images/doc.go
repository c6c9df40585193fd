// Package images moves a directory of CRIU images over one stream: Send
// reads the regular files of a directory, Receive writes them into a
// directory the receiver owns, bounding every name, size and count from the
// wire before using it.
//
// Stream layout (big-endian):
//
//	magic "PHIM" (4) | version = 1 (1)
//	then entries, each a 16-byte header and a body:
//	off size field
//	0   1    kind      1 file, 2 end
//	1   1    reserved  0
//	2   2    name_len  file: 1..MaxNameLen; end: 0
//	4   4    mode      file permission bits (<= 0777)
//	8   8    size      file: bytes of data; end: number of files sent
//	name_len bytes of name (no '/', not "." or "..", no NUL), then size bytes of data
//
// A stream that ends without an end entry, or whose end count differs from
// the files received, is an error.
package images
