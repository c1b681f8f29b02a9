"""Independent PyTorch CIFAR models, written from the public kuangliu/pytorch-cifar layout
(not from train/models.py): ResNet-18 (3x3 stem, BasicBlocks [2, 2, 2, 2] with 1x1
projection shortcuts, conv + BatchNorm) and DenseNet-BC (bottlenecks and transitions);
BatchNorm momentum 0.1 and eps 1e-5, global average pool, linear; NCHW.

tests/test_whole_step.py checks the project's models and training step against them;
benchmarks/cpu_train_speed.py times them against the trainer's step.
"""

import torch

nn = torch.nn
F = torch.nn.functional


class TorchBasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class TorchResNet18(nn.Module):
    def __init__(self, width, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        for stage in range(4):
            planes = width * 2**stage
            blocks = []
            for stride in (1 if stage == 0 else 2, 1):
                blocks.append(TorchBasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, out.shape[-1])  # kuangliu's 4x4 pool on the 4x4 map
        return self.linear(out.flatten(1))


class TorchBottleneck(nn.Module):
    def __init__(self, in_planes, growth_rate):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class TorchTransition(nn.Module):
    def __init__(self, in_planes, out_planes):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x):
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class TorchDenseNet(nn.Module):
    def __init__(self, nblocks, growth_rate, reduction=0.5, num_classes=10):
        super().__init__()
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(3, planes, 3, padding=1, bias=False)
        self.nblocks = nblocks
        for stage, size in enumerate(nblocks, start=1):
            layers = []
            for _ in range(size):
                layers.append(TorchBottleneck(planes, growth_rate))
                planes += growth_rate
            setattr(self, f"dense{stage}", nn.Sequential(*layers))
            if stage < len(nblocks):
                out_planes = int(planes * reduction)
                setattr(self, f"trans{stage}", TorchTransition(planes, out_planes))
                planes = out_planes
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        for stage in range(1, len(self.nblocks) + 1):
            out = getattr(self, f"dense{stage}")(out)
            if stage < len(self.nblocks):
                out = getattr(self, f"trans{stage}")(out)
        out = F.relu(self.bn(out))
        out = F.avg_pool2d(out, out.shape[-1])
        return self.linear(out.flatten(1))
