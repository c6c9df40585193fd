package phaul

import (
	"bytes"
	"strings"
	"testing"
)

func TestDecodeLazyRequest(t *testing.T) {
	for _, tc := range []struct {
		in, err string
	}{
		{`{"op":"park"}` + "\n", ""},
		{`{"op":"detach","timeout_ms":300000}` + "\n", ""},
		{`{"op":"wait"}` + "\n", ""},
		{`{"op":"kill"}` + "\n", "unknown op"},
		{`{"op":"detach","timeout_ms":-1}` + "\n", "out of range"},
		{`{"op":"park"}`, "EOF"},                                                // no end of line
		{`{"op":"park","x":"` + strings.Repeat("a", 2000) + `"}` + "\n", "EOF"}, // longer than a request may be
		{"not json\n", "invalid character"},
	} {
		_, err := decodeLazyRequest(strings.NewReader(tc.in))
		switch {
		case tc.err == "" && err != nil:
			t.Errorf("%.40q: %v", tc.in, err)
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("%.40q: got %v, want an error with %q", tc.in, err, tc.err)
		}
	}
}

// FuzzLazyControl: any bytes on a control stream give a known op or an
// error, and a reply the helper writes decodes to itself.
func FuzzLazyControl(f *testing.F) {
	f.Add([]byte(`{"op":"detach","timeout_ms":5}` + "\n"))
	f.Add([]byte(`{"op":"status"}` + "\n"))
	f.Add([]byte(`{"err":"x","ended":true,"stats":{"Tasks":3},"remote_pages":7}` + "\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		q, err := decodeLazyRequest(bytes.NewReader(b))
		if err == nil && (!lazyOps[q.Op] || q.TimeoutMS < 0) {
			t.Fatalf("accepted %+v", q)
		}
		var r lazyReply
		if err := readJSONLine(bytes.NewReader(b), maxLazyReply, &r); err != nil {
			return
		}
		var buf bytes.Buffer
		if err := writeJSONLine(&buf, r); err != nil {
			t.Fatal(err)
		}
		var back lazyReply
		if err := readJSONLine(&buf, maxLazyReply, &back); err != nil || back.Err != r.Err || back.Stats != r.Stats {
			t.Fatalf("reply %+v did not survive a round trip: %+v, %v", r, back, err)
		}
	})
}
