package linux

import (
	"errors"
	"fmt"
	"sync"
)

// ErrNotSupported is wrapped by every error that reports a missing kernel
// feature (not compiled in, too old, blocked for this process). Callers
// branch on it with errors.Is; the rest of the message says why.
var ErrNotSupported = errors.New("not supported")

// probe runs fn until it gives a conclusive answer and then caches it.
type probe[T any] struct {
	name      string // kernel name of the feature, e.g. "PAGEMAP_SCAN"
	minKernel string // first release with the feature, e.g. "6.7"; "" if unknown
	fn        func() (T, error)

	mu   sync.Mutex
	done bool // guarded by mu
	val  T    // guarded by mu
	err  error
}

func (p *probe[T]) get() (T, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done {
		return p.val, p.err
	}
	v, err := p.fn()
	switch {
	case err == nil:
	case errors.Is(err, ErrNotSupported):
		err = fmt.Errorf("%s%s: %w", p.name, p.since(), err)
	default:
		// Inconclusive (EMFILE, EINTR, ...): report it, probe again next time.
		var zero T
		return zero, fmt.Errorf("probe %s: %w", p.name, err)
	}
	p.done, p.val, p.err = true, v, err
	return v, err
}

func (p *probe[T]) since() string {
	if p.minKernel == "" {
		return ""
	}
	return " (Linux " + p.minKernel + "+)"
}

// newProbe returns a function that runs fn once it is first called and
// caches its answer if it is nil or wraps ErrNotSupported. A cached
// ErrNotSupported is wrapped with name and minKernel.
func newProbe(name, minKernel string, fn func() error) func() error {
	p := &probe[struct{}]{name: name, minKernel: minKernel, fn: func() (struct{}, error) {
		return struct{}{}, fn()
	}}
	return func() error {
		_, err := p.get()
		return err
	}
}

// newValueProbe is newProbe for a probe that also measures something (the
// userfaultfd feature mask); the value is cached with the answer.
func newValueProbe[T any](name, minKernel string, fn func() (T, error)) func() (T, error) {
	p := &probe[T]{name: name, minKernel: minKernel, fn: fn}
	return p.get
}
