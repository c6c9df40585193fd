package phaul

import (
	"context"
	"fmt"
	"log/slog"
	"strings"

	"github.com/phaul/phaul/core/wire"
)

// localReport runs this host's pre-flight check in its wire form.
func localReport(ctx context.Context, criuPath string, log *slog.Logger) (*wire.HostReport, error) {
	r, err := Check(ctx, CheckConfig{CRIUPath: criuPath, Logger: log})
	if err != nil {
		return nil, fmt.Errorf("pre-flight: %w", err)
	}
	return reportToWire(r), nil
}

func reportToWire(r *CheckReport) *wire.HostReport {
	h := &wire.HostReport{Hostname: r.Host, Kernel: r.Kernel, CriuVersion: r.CRIUVersion,
		CpuVendor: r.CPU.Vendor, CpuModel: r.CPU.Model, CpuFlags: r.CPU.Flags, Ok: r.OK()}
	for _, it := range r.Items {
		h.Items = append(h.Items, &wire.CheckItem{Feature: it.Feature, Available: it.Available,
			Detail: it.Detail, Required: it.Required})
	}
	return h
}

// failedItems names the required checks a report failed, with details.
func failedItems(h *wire.HostReport) string {
	var out []string
	for _, it := range h.GetItems() {
		if it.GetRequired() && !it.GetAvailable() {
			out = append(out, it.GetFeature()+": "+it.GetDetail())
		}
	}
	if len(out) == 0 {
		return "no required check failed"
	}
	return strings.Join(out, "; ")
}

// checkPeer decides whether the tree may move from src to dst: the
// destination must pass its own checks and have every CPU flag the source
// has (the tree may use any of them).
func checkPeer(src, dst *wire.HostReport) error {
	if dst == nil || src == nil {
		return fmt.Errorf("pre-flight: a host sent no report")
	}
	if !dst.GetOk() {
		return fmt.Errorf("destination cannot restore: %s", failedItems(dst))
	}
	err := CPUCompatible(CPU{Flags: src.GetCpuFlags(), Model: src.GetCpuModel()},
		CPU{Flags: dst.GetCpuFlags(), Model: dst.GetCpuModel()})
	if err != nil {
		return fmt.Errorf("pre-flight: %w", err)
	}
	return nil
}
