package transport

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sync/errgroup"
)

// The shaped link: two network namespaces joined by a veth pair with
// private addresses. The dialer's side (a) sends through a token bucket, as
// a source host's uplink would; the listener's side (b) delays by 1 ms where
// the kernel has netem, so the idle RTT is about 1 ms. Neither end is in the namespace of this
// process, so each runs as this test binary re-executed with "ip netns exec"
// (see runHelper); nothing touches the host's own network.
const (
	linkNet   = "10.231.7."
	linkAddrA = linkNet + "1"
	linkAddrB = linkNet + "2"
	linkPort  = "7411"
)

var (
	linkShapeA = []string{"tbf", "rate", "200mbit", "burst", "256kb", "latency", "50ms"}
	linkShapeB = []string{"netem", "delay", "1ms"}
)

// Environment of a helper process.
const (
	helperEnv  = "PHAUL_TRANSPORT_HELPER" // "rtt-server" or "rtt-client"
	tlsDirEnv  = "PHAUL_TRANSPORT_TLS_DIR"
	addrEnv    = "PHAUL_TRANSPORT_ADDR"
	paramsEnv  = "PHAUL_TRANSPORT_RTT_PARAMS" // rttParams as JSON
	helperWait = time.Minute
)

// shapedLink is a pair of namespaces that exist until the test ends.
type shapedLink struct {
	nsA, nsB string
}

// newShapedLink creates the namespaces, or skips, saying why, when this
// process is not root or lacks ip or tc.
func newShapedLink(tb testing.TB) *shapedLink {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("SKIP: shaped link needs root to create network namespaces")
	}
	for _, tool := range []string{"ip", "tc"} {
		if _, err := exec.LookPath(tool); err != nil {
			tb.Skipf("SKIP: shaped link needs %s (iproute2): %v", tool, err)
		}
	}
	id := strconv.Itoa(os.Getpid())
	l := &shapedLink{nsA: "phaul-rtt-a-" + id, nsB: "phaul-rtt-b-" + id}
	vethA, vethB := "prta"+id, "prtb"+id // at most 15 bytes
	for _, ns := range []string{l.nsA, l.nsB} {
		run(tb, "ip", "netns", "add", ns)
		tb.Cleanup(func() { runQuiet("ip", "netns", "del", ns) })
	}
	run(tb, "ip", "link", "add", vethA, "netns", l.nsA, "type", "veth", "peer", "name", vethB, "netns", l.nsB)
	for _, s := range []struct{ ns, dev, addr string }{{l.nsA, vethA, linkAddrA}, {l.nsB, vethB, linkAddrB}} {
		run(tb, "ip", "-n", s.ns, "addr", "add", s.addr+"/30", "dev", s.dev)
		run(tb, "ip", "-n", s.ns, "link", "set", "lo", "up")
		run(tb, "ip", "-n", s.ns, "link", "set", s.dev, "up")
	}
	run(tb, append([]string{"tc", "-n", l.nsA, "qdisc", "add", "dev", vethA, "root"}, linkShapeA...)...)
	// netem is a module some kernels lack; the link is still shaped.
	shapeB := append([]string{"tc", "-n", l.nsB, "qdisc", "add", "dev", vethB, "root"}, linkShapeB...)
	if out, err := exec.Command(shapeB[0], shapeB[1:]...).CombinedOutput(); err != nil {
		tb.Logf("no added delay on the return path: %s: %v: %s", strings.Join(shapeB, " "), err, bytes.TrimSpace(out))
	}
	return l
}

// setNotSentLowat sets net.ipv4.tcp_notsent_lowat in namespace a, the
// default TCP_NOTSENT_LOWAT of its sockets, including open ones: the same
// effect as setting the option through Config.Control, which this package's
// tests cannot do without the constant from x/sys/unix. 0 means unlimited.
func (l *shapedLink) setNotSentLowat(tb testing.TB, bytes uint32) {
	tb.Helper()
	if bytes == 0 {
		bytes = 1<<32 - 1
	}
	run(tb, "ip", "netns", "exec", l.nsA, "sysctl", "-q", "-w", fmt.Sprintf("net.ipv4.tcp_notsent_lowat=%d", bytes))
}

// measure runs the listener in b and the measuring dialer in a.
func (l *shapedLink) measure(tb testing.TB, serverDir, clientDir string, p rttParams) rttReport {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	addr := linkAddrB + ":" + linkPort
	server := l.helper(ctx, l.nsB, "rtt-server", serverDir, addr, p)
	var serverErr bytes.Buffer
	server.Stderr = &serverErr
	out, err := server.StdoutPipe()
	if err != nil {
		tb.Fatal(err)
	}
	if err := server.Start(); err != nil {
		tb.Fatal(err)
	}
	defer func() {
		if err := server.Wait(); err != nil {
			tb.Errorf("server helper: %v: %s", err, serverErr.Bytes())
		}
	}()
	if line, err := bufio.NewReader(out).ReadString('\n'); line != "ready\n" {
		cancel()
		tb.Fatalf("server helper said %q, %v: %s", line, err, serverErr.Bytes())
	}
	client := l.helper(ctx, l.nsA, "rtt-client", clientDir, addr, p)
	var clientErr bytes.Buffer
	client.Stderr = &clientErr
	data, err := client.Output()
	if err != nil {
		cancel()
		tb.Fatalf("client helper: %v: %s", err, clientErr.Bytes())
	}
	var rep rttReport
	if err := json.Unmarshal(data, &rep); err != nil {
		tb.Fatalf("client helper output %q: %v", data, err)
	}
	return rep
}

// helper returns a command running this test binary in ns as mode.
func (l *shapedLink) helper(ctx context.Context, ns, mode, tlsDir, addr string, p rttParams) *exec.Cmd {
	params, _ := json.Marshal(p)
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", ns, os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(),
		helperEnv+"="+mode, tlsDirEnv+"="+tlsDir, addrEnv+"="+addr, paramsEnv+"="+string(params))
	cmd.WaitDelay = 5 * time.Second
	return cmd
}

// runHelper is a helper process's main: mode rtt-server accepts one session
// and serves it, rtt-client measures and prints an rttReport as JSON.
func runHelper(mode string) int {
	if err := helperMain(mode); err != nil {
		fmt.Fprintf(os.Stderr, "%s: %v\n", mode, err)
		return 1
	}
	return 0
}

func helperMain(mode string) error {
	ctx, cancel := context.WithTimeout(context.Background(), helperWait)
	defer cancel()
	id, err := LoadTLS(os.Getenv(tlsDirEnv))
	if err != nil {
		return err
	}
	var p rttParams
	if err := json.Unmarshal([]byte(os.Getenv(paramsEnv)), &p); err != nil {
		return err
	}
	cfg := p.config(id)
	switch mode {
	case "rtt-server":
		l, err := Listen(ctx, os.Getenv(addrEnv), cfg)
		if err != nil {
			return err
		}
		defer l.Close()
		fmt.Println("ready")
		var g errgroup.Group
		for range p.sessions() {
			s, err := l.Accept(ctx)
			if err != nil {
				return errors.Join(err, g.Wait())
			}
			defer s.Close()
			g.Go(func() error { return serveRTT(context.Background(), s) })
		}
		return g.Wait()
	case "rtt-client":
		var ss []*Session
		for range p.sessions() {
			s, err := Dial(ctx, os.Getenv(addrEnv), cfg)
			if err != nil {
				return err
			}
			defer s.Close()
			ss = append(ss, s)
		}
		rep, err := measureRTT(context.Background(), ss, p)
		for _, s := range ss {
			err = errors.Join(err, hangUp(s))
		}
		if err != nil {
			return err
		}
		return json.NewEncoder(os.Stdout).Encode(rep)
	}
	return fmt.Errorf("unknown helper mode %q", mode)
}

func run(tb testing.TB, args ...string) {
	tb.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		tb.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

func runQuiet(args ...string) {
	_ = exec.Command(args[0], args[1:]...).Run() // cleanup; the namespace may be gone
}
