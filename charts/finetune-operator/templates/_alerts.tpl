{{/*
The alert rule groups: rendered into the PrometheusRule, and extracted by tests/helm/run.sh
into a plain rule file for `promtool test rules` and the test Prometheus.
Trainer series carry the pod's `namespace`, `pod`, `finetune_job` and `attempt` (PodMonitor
relabelings); operator series carry the Service's `job`.
*/}}
{{- define "finetune-operator.alertGroups" -}}
{{- $r := .Values.prometheusRule }}
{{- $op := printf "job=%q, namespace=%q" (include "finetune-operator.metricsJob" .) .Release.Namespace }}
{{- $extra := $r.additionalAlertLabels }}
groups:
  - name: finetune-jobs
    rules:
      - alert: FinetuneJobFailed
        # The operator's Failed count rose; `max without` ignores which replica reports it, so a
        # leader change alone does not fire it.
        expr: |
          max without (instance, pod) (finetune_operator_jobs{phase="Failed", {{ $op }}})
            > max without (instance, pod) (finetune_operator_jobs{phase="Failed", {{ $op }}} offset 10m)
        labels:
          severity: warning
          {{- with $extra }}{{ toYaml . | nindent 10 }}{{ end }}
        annotations:
          summary: A FinetuneJob failed
          description: {{`'The number of Failed FinetuneJobs rose to {{ $value }} in the last 10 minutes. Find them with kubectl get finetunejobs -A; their .status.conditions and .status.attempts say why.'`}}
      - alert: FinetuneTrainingStalled
        # The same attempt (pod) reports the same step as {{ $r.stalledFor }} ago and is not done.
        expr: |
          (finetune_trainer_step == finetune_trainer_step offset {{ $r.stalledFor }})
            and finetune_trainer_step < finetune_trainer_total_steps
        for: 2m
        labels:
          severity: warning
          {{- with $extra }}{{ toYaml . | nindent 10 }}{{ end }}
        annotations:
          summary: A trainer made no optimizer step for {{ $r.stalledFor }}
          description: {{ printf "%s made no step for %s (stuck at step {{ $value }}). Check the pod's log and GPU." `{{ $labels.namespace }}/{{ $labels.finetune_job }} (pod {{ $labels.pod }})` $r.stalledFor | quote }}
      - alert: FinetuneLossDiverged
        # NaN/Inf, or far above the best loss of the window.
        expr: |
          (finetune_trainer_train_loss != finetune_trainer_train_loss)
            or (abs(finetune_trainer_train_loss) == +Inf)
            or (finetune_trainer_train_loss > {{ $r.lossDivergenceFactor }} * min_over_time(finetune_trainer_train_loss[{{ $r.lossWindow }}]))
        for: 1m
        labels:
          severity: critical
          {{- with $extra }}{{ toYaml . | nindent 10 }}{{ end }}
        annotations:
          summary: Training loss diverged
          description: {{ printf "%s: train loss is {{ $value }} (NaN/Inf or over %v x its %s minimum). Lower the learning rate or raise warmup; the trainer exits with code 3 on NaN." `{{ $labels.namespace }}/{{ $labels.finetune_job }}` $r.lossDivergenceFactor $r.lossWindow | quote }}
      - alert: FinetuneCheckpointTooOld
        expr: |
          finetune_trainer_checkpoint_age_seconds > {{ $r.checkpointMaxAgeSeconds }}
            and finetune_trainer_step < finetune_trainer_total_steps
        for: 5m
        labels:
          severity: warning
          {{- with $extra }}{{ toYaml . | nindent 10 }}{{ end }}
        annotations:
          summary: The newest checkpoint is too old
          description: {{ printf "%s: the newest checkpoint is {{ $value | humanizeDuration }} old (limit %vs); a preemption now loses that much work. Lower spec.checkpoint.everySteps." `{{ $labels.namespace }}/{{ $labels.finetune_job }}` $r.checkpointMaxAgeSeconds | quote }}
  - name: finetune-operator
    rules:
      - alert: FinetuneOperatorDown
        expr: absent(up{ {{- $op -}} } == 1)
        for: {{ $r.operatorDownFor }}
        labels:
          severity: critical
          {{- with $extra }}{{ toYaml . | nindent 10 }}{{ end }}
        annotations:
          summary: No finetune-operator replica is up
          description: {{ printf "No replica of %s in %s has been scraped successfully for %s: FinetuneJobs are not reconciled." (include "finetune-operator.fullname" .) .Release.Namespace $r.operatorDownFor | quote }}
      - alert: FinetuneOperatorReconcileErrorsHigh
        expr: |
          sum by (job, namespace) (rate(finetune_operator_reconcile_errors_total{ {{- $op -}} }[5m]))
            / sum by (job, namespace) (rate(finetune_operator_reconciliations_total{ {{- $op -}} }[5m]))
            > {{ $r.reconcileErrorRatio }}
        for: 10m
        labels:
          severity: warning
          {{- with $extra }}{{ toYaml . | nindent 10 }}{{ end }}
        annotations:
          summary: Many reconciles fail
          description: {{`'{{ $value | humanizePercentage }} of reconciles fail. See finetune_operator_reconcile_errors_total by reason and the operator log.'`}}
{{- end }}
